import sys

from vae_scale.cli import main

sys.exit(main())
