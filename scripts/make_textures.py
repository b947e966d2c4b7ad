#!/usr/bin/env python
"""Write the bundled textures data set to datasets/textures (see ml_infer/textures.py).

python scripts/make_textures.py [--out DIR] [--patch-size 16] [--seed 0] [--overwrite]
"""

import sys

from ml_infer.textures import main

if __name__ == "__main__":
    sys.exit(main())
