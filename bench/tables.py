"""Console tables that fit the console's width: columns are split over several tables rather than cut."""

from typing import List, Optional, Sequence

from rich.table import Table
from rich.text import Text


def fitted_tables(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], width: int, keys: int = 1,
                  right: Optional[Sequence[str]] = None) -> List[Table]:
    """rich Tables of ``rows`` (strings, rich markup allowed) under ``columns`` that fit ``width`` characters.

    Key columns (the first ``keys``) holding one value in every row go to the title ("title; dtype bf16").
    When the columns still do not fit, the other columns are spread over several tables, each repeating the
    key columns and titled "(1/2)", "(2/2)"; cells are never wrapped or cut. ``right``: the columns justified
    right (default: all but the keys).
    """
    columns, rows = list(columns), [list(r) for r in rows]
    if len(rows) > 1:
        constant = [i for i in range(keys) if len({r[i] for r in rows}) == 1]
        if constant and len(constant) < keys:
            title += "; " + ", ".join(f"{columns[i]} {rows[0][i]}" for i in constant)
            kept = [i for i in range(len(columns)) if i not in constant]
            columns, rows, keys = [columns[i] for i in kept], [[r[i] for i in kept] for r in rows], keys - len(constant)
    right = set(columns[keys:] if right is None else right)

    def cell(text: str) -> int:
        return Text.from_markup(text).cell_len

    # a column takes its widest cell, one space of padding each side and one border character
    need = [max([cell(c)] + [cell(r[i]) for r in rows]) + 3 for i, c in enumerate(columns)]
    base = sum(need[:keys]) + 1
    groups: List[List[int]] = [[]]
    used = base
    for i in range(keys, len(columns)):
        if groups[-1] and used + need[i] > width:
            groups.append([])
            used = base
        groups[-1].append(i)
        used += need[i]
    tables = []
    for n, group in enumerate(groups, 1):
        table = Table(title=title if len(groups) == 1 else f"{title} ({n}/{len(groups)})")
        shown = [*range(keys), *group]
        for i in shown:
            table.add_column(columns[i], justify="right" if columns[i] in right else "left", no_wrap=True)
        for r in rows:
            table.add_row(*(r[i] for i in shown))
        tables.append(table)
    return tables
