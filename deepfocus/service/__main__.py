"""``python -m deepfocus.service serve|ping|predict ...``"""
import sys

from .cli import main

sys.exit(main())
