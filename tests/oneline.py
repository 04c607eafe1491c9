"""The bad-input contract checked by the CLI tests: exit code 2, one line, nothing left."""

from paramarket_jax.cli.main import main


def call(argv) -> int:
    """Run the CLI in-process; its exit code."""
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse usage errors exit from inside main
        return exit_.code


def check_one_line(code, captured, needle, folder, keep=()):
    """Exit 2, exactly one stderr line naming the problem, no traceback, nothing in folder."""
    err = captured.err.strip()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("paramarket: error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in captured.out + captured.err
    left = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert left == [], f"left behind: {left}"
