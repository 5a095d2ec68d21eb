import sys

from .check import main

USAGE = "usage: python -m persona_em check FILE..."

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "check":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))
