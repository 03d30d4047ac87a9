"""bench/peft_suite (PEFT's own tests run with patch_peft): the comparison flags every test whose outcome differs
or that ran in one mode only, and the LoRA selection keeps PEFT's LoRA tests and no other tuner's."""

import json

from bench.peft_suite import compare, plugin


def _write(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(path)


def test_compare_lists_every_differing_outcome(tmp_path, capsys):
    unpatched = _write(tmp_path / "u.jsonl", [dict(id="t::a", outcome="passed"), dict(id="t::b", outcome="failed"),
                                              dict(id="t::c", outcome="skipped"), dict(id="t::d", outcome="passed")])
    patched = _write(tmp_path / "p.jsonl", [dict(id="t::a", outcome="passed", fused=3, peft=1),
                                            dict(id="t::b", outcome="passed", reason=""),
                                            dict(id="t::c", outcome="skipped"),
                                            dict(id="t::e", outcome="passed")])
    result = compare.compare(compare.read(unpatched), compare.read(patched))
    assert sorted(result["differ"]) == ["t::b", "t::d", "t::e"]
    assert result["fused"] == 3 and result["peft"] == 1 and result["tests_with_fused"] == 1
    assert result["counts"]["unpatched"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert compare.main([unpatched, patched]) == 1
    assert "3 tests differ" in capsys.readouterr().out
    assert compare.main([unpatched, unpatched]) == 0


def test_lora_selection_by_test_id():
    keep = ["tests/test_custom_models.py::TestPeftCustomModel::test_merge_layers[Vanilla MLP 1 LoRA-MLP-LoraConfig-"
            "config_kwargs6]",
            "tests/test_encoder_decoder_models.py::TestEncoderDecoderModels::test_attributes_parametrized[LoraConfig-"
            "config_kwargs14-peft-internal-testing/tiny-random-BartForConditionalGeneration]",
            "tests/test_custom_models.py::TestMultiRankAdapter::test_dora_ephemeral_gpu_offload"]
    drop = ["tests/test_custom_models.py::TestPeftCustomModel::test_merge_layers[Vanilla MLP 1 VeRA-MLP-VeraConfig-"
            "config_kwargs185]",
            "tests/test_custom_models.py::TestPeftCustomModel::test_merge_layers[Vanilla MLP 1 GLoRA-MLP-GloraConfig-"
            "config_kwargs0]",
            "tests/test_custom_models.py::TestPeftCustomModel::test_set_requires_grad[AdaLoraConfig]",
            "tests/test_custom_models.py::TestRequiresGrad::test_requires_grad_vblora_same_targets"]
    assert all(plugin.is_lora_test(i) for i in keep)
    assert not any(plugin.is_lora_test(i) for i in drop)
