"""``python -m latentseek`` runs the command line (torchrun needs the module form: ``torchrun -m latentseek``)."""

import sys

from latentseek.eval.cli import main

sys.exit(main())
