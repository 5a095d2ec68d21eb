#!/usr/bin/env bash
# paper/paper-<profile>.pdf from paper.tex with that run's numbers (paper/generated/<profile>/) and figures
# (figures/<profile>/). Needs latexmk and TeX. Run by the workflow's last rule and by `make paper PROFILE=...`.
set -euo pipefail
profile="$1"
cd "$(dirname "$0")"
if latexmk -pdf -interaction=nonstopmode -halt-on-error -jobname="paper-$profile" \
     -usepretex="\\def\\profile{$profile}" paper.tex > "build-$profile.log" 2>&1; then
  echo "paper: paper/paper-$profile.pdf"
else
  tail -30 "build-$profile.log"
  exit 1
fi
