"""`python -m tram_dist finetune CONFIG [key=value ...]` (the same as `tram-dist`)."""
from .cli import main

main()
