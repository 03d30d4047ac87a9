"""A pytest plugin that runs PEFT's own tests with ``lora_fast.patch_peft`` applied to every PEFT model they build.

Load it into a run of PEFT's test suite (not lora-fast's: nothing here is collected by our suite) with
``-p bench.peft_suite.plugin`` (the lora-fast checkout on PYTHONPATH) and choose the mode:

    --lora-fast=patched     every tuner PEFT injects (BaseTuner.inject_adapter: get_peft_model,
                            PeftModel.from_pretrained, add_adapter / load_adapter, inject_adapter_in_model) has
                            patch_peft applied to its model right after the injection
    --lora-fast=unpatched   the same run with nothing patched (the baseline)
    --lora-fast-only-lora   keep the tests of PEFT's LoRA (DoRA included): those parametrized with a LoraConfig,
                            and the unparametrized ones whose class or name says LoRA or DoRA (not another
                            tuner's: GLoRA, VeRA, LoHa, ... are left out)
    --lora-fast-shadow      (patched) each fused call also runs PEFT's own forward on the same input (no grad;
                            not for calls that draw a dropout mask) and records the largest difference relative to
                            the largest |output| ("shadow": the test's worst, "shadow_calls": calls compared)
    --lora-fast-out=PATH    one JSON line per test: id, outcome (passed / failed / error / skipped / xfailed /
                            xpassed), the first line of the failure, and the number of LoRA layer calls that ran
                            the fused op ("fused") and PEFT's own forward ("peft") in patched mode

The backend is lora-fast's usual switch: LORA_FAST_BACKEND=reference (plain PyTorch) or triton (with
TRITON_INTERPRET=1 on a machine without a GPU; set here when no CUDA device is present, before lora_fast is
imported). compare.py turns two such files into the outcome table and the list of tests whose outcome differs.

PEFT's tests import ``diffusers`` (testing_common.py) and ``datasets`` (testing_utils.py) at module level, for a
few tests that download models or data. When either is not installed, a stand-in module is registered whose
names raise ImportError when used, so that the rest of the files collect; those few tests fail in both modes.
"""

import functools
import importlib.machinery
import json
import os
import re
import sys
import tempfile
import types

import pytest


class _Counts:
    fused = 0
    summed = 0   # of the fused calls: several active adapters as one call (peft_interop._summed_adapters)
    peft = 0
    shadow = 0.0
    shadow_calls = 0


def _stand_in(name: str, attributes: tuple) -> None:
    """Register a module ``name`` whose ``attributes`` raise ImportError when called (only if ``name`` is missing)."""
    try:
        __import__(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    # a spec marks it as a module (find_spec raises on a sys.modules entry without one); no loader: not importable
    # as a package, so libraries that probe it see a module and use only the names above
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def missing(attribute):
        def call(*args, **kwargs):
            raise ImportError(f"{name}.{attribute}: {name} is not installed (stand-in from bench.peft_suite)")
        return call

    for attribute in attributes:
        setattr(module, attribute, missing(attribute))
    sys.modules[name] = module


def pytest_addoption(parser):
    group = parser.getgroup("lora-fast")
    group.addoption("--lora-fast", choices=("patched", "unpatched"), default="unpatched",
                    help="apply lora_fast.patch_peft to every PEFT model the tests build (patched), or not")
    group.addoption("--lora-fast-only-lora", action="store_true", help="deselect the tests of other tuners")
    group.addoption("--lora-fast-shadow", action="store_true", help="compare each fused call with PEFT's forward")
    group.addoption("--lora-fast-out", default=None, help="write one JSON line per test to this file")


# tuners whose names contain "lora" or that a LoRA-sounding test name may mention, but that are not PEFT's LoRA
_OTHER_TUNERS = re.compile(r"(?i)(adalora|glora|gralora|tinylora|randlora|vblora|unilora|vera|loha|lokr|oft|boft|"
                           r"ia3|hra|c3a|fourier|shira|bone|miss|road|waveft|delora|osf|psoft|adamss|frod|beft|hira|"
                           r"supertuning|trainable)")


def is_lora_test(nodeid: str) -> bool:
    """True for a test of PEFT's LoRA (DoRA included), judged by its id (see --lora-fast-only-lora)."""
    name = nodeid.split("::", 1)[-1]
    if re.search(r"[\[-]LoraConfig-", name):
        return True
    if re.search(r"[\[-]\w+Config-", name):
        return False   # parametrized with another tuner's config
    return bool(re.search(r"(?i)lora|dora", name)) and not _OTHER_TUNERS.search(name)


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--lora-fast-only-lora"):
        return
    kept = [item for item in items if is_lora_test(item.nodeid)]
    config.hook.pytest_deselected(items=[item for item in items if not is_lora_test(item.nodeid)])
    items[:] = kept


def _install_patch(shadow: bool) -> None:
    if not os.environ.get("TRITON_INTERPRET"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"   # read when @triton.jit decorates: before lora_fast's import
    from peft.tuners import tuners_utils

    import lora_fast
    from lora_fast import peft_interop

    inject = tuners_utils.BaseTuner.inject_adapter

    @functools.wraps(inject)
    def inject_and_patch(self, model, *args, **kwargs):
        result = inject(self, model, *args, **kwargs)
        lora_fast.patch_peft(model, warn=False)
        return result

    tuners_utils.BaseTuner.inject_adapter = inject_and_patch

    choose = peft_interop._fused_adapter

    @functools.wraps(choose)
    def counted(*args, **kwargs):
        adapter = choose(*args, **kwargs)
        if adapter is None:
            _Counts.peft += 1
        else:
            _Counts.fused += 1
        return adapter

    peft_interop._fused_adapter = counted
    summed = peft_interop._summed_adapters

    @functools.wraps(summed)
    def counted_summed(*args, **kwargs):
        # asked after _fused_adapter said no: several active adapters fused as one call move from "peft" to "fused"
        operands = summed(*args, **kwargs)
        if operands is not None:
            _Counts.peft -= 1
            _Counts.fused += 1
            _Counts.summed += 1
        return operands

    peft_interop._summed_adapters = counted_summed
    if shadow:
        _install_shadow(peft_interop)


def _install_shadow(peft_interop) -> None:
    import torch

    fused_forward = peft_interop._fused_forward

    def compared(module, x, *args, **kwargs):
        out = fused_forward(module, x, *args, **kwargs)
        # the look-up is not a call of the layer: take it off the counts
        adapter = peft_interop._fused_adapter(module, x, args, kwargs)
        if adapter is None:
            _Counts.peft -= 1
            return out
        _Counts.fused -= 1
        if not isinstance(out, torch.Tensor):
            return out
        dropout = module.lora_dropout[adapter]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
            return out   # PEFT would draw another mask
        with torch.no_grad():
            reference = type(module).forward(module, x, *args, **kwargs)
        scale = reference.abs().max().item() if reference.numel() else 0.0
        difference = (out.detach() - reference).abs().max().item() if reference.numel() else 0.0
        _Counts.shadow = max(_Counts.shadow, difference / scale if scale > 0 else difference)
        _Counts.shadow_calls += 1
        return out

    peft_interop._fused_forward = compared


def pytest_configure(config):
    _stand_in("diffusers", ("StableDiffusionPipeline",))
    _stand_in("datasets", ("load_dataset", "Dataset"))
    # the measured kernel choice keeps its cache out of the user's home during the run
    os.environ.setdefault("LORA_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="lora-fast-peft-suite-"))
    if config.getoption("--lora-fast") == "patched":
        _install_patch(config.getoption("--lora-fast-shadow"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _Counts.fused = _Counts.peft = _Counts.shadow_calls = _Counts.summed = 0
    _Counts.shadow = 0.0
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown":
        report.user_properties.append(("lora_fast_calls", (_Counts.fused, _Counts.peft)))
        if _Counts.summed:
            report.user_properties.append(("lora_fast_summed", _Counts.summed))
        if _Counts.shadow_calls:
            report.user_properties.append(("lora_fast_shadow", (_Counts.shadow, _Counts.shadow_calls)))


def _outcome(report) -> str:
    if report.when == "call" and hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.skipped:
        return "skipped"
    if report.failed:
        return "failed" if report.when == "call" else "error"
    return "passed"


def pytest_runtest_logreport(report):
    # runs in the controller with xdist too (the workers' reports are forwarded with their user_properties)
    results = getattr(_config, "results", None)
    if results is None:
        return
    entry = results.setdefault(report.nodeid, {"id": report.nodeid, "outcome": "passed", "reason": ""})
    outcome = _outcome(report)
    # the first non-passing phase decides (an error in teardown after a passed call is an error)
    if entry["outcome"] == "passed" and outcome != "passed":
        entry["outcome"] = outcome
        if report.longrepr is not None:
            text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
                getattr(report.longrepr, "reprcrash", None) and report.longrepr.reprcrash.message or report.longrepr)
            entry["reason"] = str(text).strip().splitlines()[0][:300] if str(text).strip() else ""
    for key, value in report.user_properties:
        if key == "lora_fast_calls":
            entry["fused"], entry["peft"] = value
        if key == "lora_fast_shadow":
            entry["shadow"], entry["shadow_calls"] = value
        if key == "lora_fast_summed":
            entry["summed"] = value


class _config:
    results = None


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    _config.results = {}


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--lora-fast-out")
    if path is None or _config.results is None or hasattr(session.config, "workerinput"):
        return   # an xdist worker: the controller writes the file
    with open(path, "w") as f:
        for entry in _config.results.values():
            f.write(json.dumps(entry) + "\n")
