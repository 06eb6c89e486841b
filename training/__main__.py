"""``python -m training train|eval|export ...`` (also under ``accelerate launch -m training``)."""

import sys

from training.cli import main

sys.exit(main())
