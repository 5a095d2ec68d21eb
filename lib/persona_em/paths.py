"""Where things are, each defined once: the package's data files and the repository it was installed from. The
layout of a run's folders (runs/<profile>/<stage>/<run>/) is the profile's (`config.Profile.run_dir`)."""
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DATA = PACKAGE / "data"          # constitutions, question facets, contrast items, scorer items, EM templates
REPO = PACKAGE.parents[1]        # the repository of an editable install (`make setup`): docs/, reference/
