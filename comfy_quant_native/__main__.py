"""python -m comfy_quant_native {demo,convert,inspect} ..."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    print("usage: python -m comfy_quant_native demo [options]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
