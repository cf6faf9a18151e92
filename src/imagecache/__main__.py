import sys

from imagecache.cli import main

sys.exit(main())
