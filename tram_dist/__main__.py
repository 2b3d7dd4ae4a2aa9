"""`python -m tram_dist finetune CONFIG [key=value ...]` (the same as `tram-dist`)."""
import sys

from .cli import main

sys.exit(main())
