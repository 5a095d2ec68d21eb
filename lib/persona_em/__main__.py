import sys

from .check import main

USAGE = ("usage: python -m persona_em check FILE...\n"
         "       python -m persona_em reference PROFILE.yaml DEST EXAMPLE_CONDITION\n"
         "       python -m persona_em forgetting SHORT.yaml LONG.yaml DEST   (H5 over training length)\n"
         "       python -m persona_em run SNAKEMAKE_ARGS...   (Snakemake, resuming after any interruption)")

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "check":
        sys.exit(main(sys.argv[2:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        from .runner import main as run

        sys.exit(run(sys.argv[2:]))
    if len(sys.argv) == 5 and sys.argv[1] == "reference":
        from .config import load_profile
        from .reference import collect

        print(collect(load_profile(sys.argv[2]), ".", sys.argv[3], sys.argv[4]))
        sys.exit(0)
    if len(sys.argv) == 5 and sys.argv[1] == "forgetting":
        from .config import load_profile
        from .forgetting import compare

        print(compare(load_profile(sys.argv[2]), load_profile(sys.argv[3]), ".", sys.argv[4]))
        sys.exit(0)
    print(USAGE, file=sys.stderr)
    sys.exit(2)
