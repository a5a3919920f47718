"""Unattended wafer acquisition: sections, tiles, routes, the milling/imaging scheduler, storage."""
