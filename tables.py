"""Molecule files a user hands in: .csv (a SMILES column, every column kept) and .smi, optionally
gzipped, read as they are needed so that memory does not grow with the file."""
import csv
import gzip
from pathlib import Path

from utils import InputError


def read_table(path, smiles_column=None):
    """A molecule file as (columns, rows, SMILES per row), in file order (see iter_table)."""
    columns, rows = iter_table(path, smiles_column)
    rows = list(rows)
    return columns, [fields for fields, _ in rows], [smiles for _, smiles in rows]


def iter_table(path, smiles_column=None):
    """A molecule file as (columns, rows), rows a generator of (fields, SMILES) in file order that
    reads the file as it goes: memory does not grow with the file.

    .csv: every column kept; SMILES from `smiles_column` (default: a column named smiles, any case).
    .smi: the first whitespace-separated field is the SMILES and the rest of the line its name; an
    optional `smiles` header line and # comments are skipped. Either may be gzipped (.csv.gz, .smi.gz)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    gzipped = path.suffix.lower() == ".gz"
    kind = Path(path.stem).suffix.lower() if gzipped else path.suffix.lower()
    lines = _text_lines(path, gzipped)
    if kind == ".csv":
        table = (r for r in csv.reader(lines) if r)
        columns = next(table, None)
        if columns is None:
            raise InputError(f"{path}: empty CSV")
        wanted = smiles_column or "smiles"
        matches = [i for i, c in enumerate(columns) if c.strip().lower() == wanted.strip().lower()]
        if not matches:
            raise InputError(f"{path}: no '{wanted}' column (columns: {', '.join(columns)}); "
                             f"name the SMILES column with --smiles_column")
        padded = (r + [""] * (len(columns) - len(r)) for r in table)
        return columns, ((r, r[matches[0]]) for r in padded)
    if smiles_column:
        raise InputError(f"{path}: --smiles_column applies to .csv files; a .smi file has the SMILES first")

    def smi_rows():
        first = True
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.strip().split(maxsplit=1)
            if first and fields[0].lower() == "smiles":  # a header line
                first = False
                continue
            first = False
            fields += [""] * (2 - len(fields))
            yield fields, fields[0]
    return ["smiles", "name"], smi_rows()


def _text_lines(path, gzipped):
    """Lines of a UTF-8 (optionally gzipped) text file, read as they are needed; bad bytes are a
    one-line error naming the line."""
    number = 0
    try:
        # -sig: a CSV saved by Excel starts with a BOM; newline="": the csv module sees quoted newlines
        with (gzip.open(path, "rt", encoding="utf-8-sig", newline="") if gzipped
              else open(path, encoding="utf-8-sig", newline="")) as f:
            for number, line in enumerate(f, 1):
                if "\x00" in line:
                    raise InputError(f"{path}: binary data (NUL bytes) on line {number}; "
                                     f"expected a .csv or .smi text file")
                yield line
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc.reason} after line {number}); "
                         f"save it as UTF-8 CSV or SMILES") from None
    except (OSError, EOFError) as exc:
        what = "a readable gzip file" if gzipped else "readable"
        raise InputError(f"{path}: not {what} ({exc})") from None
