"""`python -m runtime` (and the `terdit-sample` command): runtime.runtime_cli.main, started by
terdit_common.entry (SIGTERM, and a Ctrl-C while the modules load, end in one line)."""
from terdit_common.entry import run_main


def main() -> None:
    run_main("runtime.runtime_cli")


if __name__ == "__main__":
    main()
