"""python -m comfy_quant_native {demo,convert,inspect} ...

``convert`` and ``inspect`` are the ``comfy-quant`` command line (convert/cli.py)."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    from .convert.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
