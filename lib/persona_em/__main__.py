import sys

from .check import main

USAGE = ("usage: python -m persona_em check FILE...\n"
         "       python -m persona_em reference PROFILE.yaml DEST EXAMPLE_CONDITION\n"
         "       python -m persona_em forgetting SHORT.yaml LONG.yaml DEST   (H5 over training length)\n"
         "       python -m persona_em run SNAKEMAKE_ARGS...   (Snakemake, resuming after any interruption)\n"
         "       python -m persona_em clean PROFILE_NAME   (delete runs/PROFILE_NAME; refused under a live run)")

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "check":
        sys.exit(main(sys.argv[2:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        from .runner import run

        sys.exit(run(sys.argv[2:]))
    if len(sys.argv) == 3 and sys.argv[1] == "clean":
        from .runner import clean

        sys.exit(clean(sys.argv[2]))
    if len(sys.argv) == 5 and sys.argv[1] == "reference":
        from .config import load_profile
        from .reference import collect

        from .config import ProfileError

        try:
            print(collect(load_profile(sys.argv[2]), ".", sys.argv[3], sys.argv[4]))
        except (ProfileError, ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    if len(sys.argv) == 5 and sys.argv[1] == "forgetting":
        from .config import load_profile
        from .forgetting import compare

        print(compare(load_profile(sys.argv[2]), load_profile(sys.argv[3]), ".", sys.argv[4]))
        sys.exit(0)
    print(USAGE, file=sys.stderr)
    sys.exit(2)
