"""``python -m chatbot.cli``: the same as the ``chatbot`` console script."""

import sys

from chatbot.cli import main

sys.exit(main())
