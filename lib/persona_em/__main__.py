"""`python -m persona_em <command>`: validate inputs, run the workflow, collect the reference run."""
import argparse
import sys


def _profile(path: str):
    from .config import load_profile

    return load_profile(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m persona_em")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate profiles, constitutions, question files and chat JSONL")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("run", help="Snakemake in this folder, resuming after any interruption",
                       description="All arguments go to Snakemake (`make reproduce` passes its own).")
    p.add_argument("snakemake_args", nargs="*", metavar="SNAKEMAKE_ARG")
    sub.add_parser("kernel", help="register the chapters' Jupyter kernel (persona-em) for this Python")
    p = sub.add_parser("clean", help="delete runs/PROFILE_NAME and Snakemake's records; refused under a live run")
    p.add_argument("profile_name")
    p = sub.add_parser("reference", help="copy a finished run's small artifacts into DEST")
    p.add_argument("profile"), p.add_argument("dest"), p.add_argument("example", help="condition whose notebooks to keep")
    p = sub.add_parser("book", help="build the book of the committed reference run into DEST/html")
    p.add_argument("dest"), p.add_argument("--main", default="tiny", help="the reference profile it opens with")
    p = sub.add_parser("forgetting", help="H5 over training length: two profiles that differ only in it")
    p.add_argument("short"), p.add_argument("long"), p.add_argument("dest")
    p = sub.add_parser("tour", help="the teaching tour (docs/tour.ipynb): one condition through the five stages")
    p.add_argument("--profile", default="params/tiny.yaml", help="profile whose settings it uses (default tiny)")
    p.add_argument("--constitution", default="candor", help="a constitution the profile trains (e.g. neutral)")
    p.add_argument("--level", type=int, default=16, help="one of the profile's diversity levels")
    p.add_argument("--draw", type=int, default=0, help="one of the profile's replicates (subset draw and seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", help="also copy the executed notebook here (the book's reference tour)")
    if argv[:1] == ["run"]:   # everything after `run` is Snakemake's, options included
        from .runner import run

        return run(argv[1:])
    args = parser.parse_args(argv)

    from .config import ProfileError

    if args.command == "check":
        from .check import main as check

        return check(args.files)
    if args.command == "kernel":
        from .runner import ensure_kernel

        print(ensure_kernel() or "the Jupyter kernel 'persona-em' is registered for this Python")
        return 0
    if args.command == "clean":
        from .runner import clean

        return clean(args.profile_name)
    try:
        if args.command == "book":
            from .book import BookError, build

            try:
                print(build(".", args.dest, args.main))
            except BookError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        elif args.command == "tour":
            from .tour import TourError, execute

            try:
                print(execute(args.profile, args.constitution, args.level, args.draw, ".", args.threads, args.keep))
            except TourError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        elif args.command == "reference":
            from .reference import collect

            print(collect(_profile(args.profile), ".", args.dest, args.example))
        else:
            from .forgetting import compare

            print(compare(_profile(args.short), _profile(args.long), ".", args.dest))
    except (ProfileError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
