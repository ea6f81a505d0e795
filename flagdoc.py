"""docs/cli.md's flag table, made from the parser (`make docs`; tests/test_layout.py checks it)."""
from pathlib import Path

START, END = "<!-- flags:start -->\n", "\n<!-- flags:end -->"


def flag_table(parser):
    """The markdown table of every flag of main.py's parser (each action records the modes that
    take it), its default and what it does."""
    modes = next(a for a in parser._actions if a.dest == "mode").choices
    lines = ["| flag | default | modes | what it does |", "|---|---|---|---|"]
    for action in (a for a in parser._actions if hasattr(a, "modes")):
        default = "" if action.default is None or action.default is False else f"`{action.default}`"
        takes = "all" if set(modes) <= action.modes else ", ".join(m for m in modes if m in action.modes)
        choices = f" ({' / '.join(map(str, action.choices))})" if action.choices else ""
        lines.append(f"| `{action.option_strings[0]}` | {default} | {takes} | "
                     f"{(action.help or '').replace('%%', '%').replace('|', '/')}{choices} |")
    return "\n".join(lines)


def table_in(path):
    text = Path(path).read_text()
    return text[text.index(START) + len(START):text.index(END)]


def write_flag_table(parser, path):
    """Replace the table between the flag markers of `path` with flag_table(parser)."""
    text = Path(path).read_text()
    head, tail = text[:text.index(START) + len(START)], text[text.index(END):]
    Path(path).write_text(head + flag_table(parser) + tail)
