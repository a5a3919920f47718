"""Gas cluster ion beam milling: scan waveforms, the milling cycle, mill-rate and dose models, flattening."""
