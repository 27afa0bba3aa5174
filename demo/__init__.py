"""The demo: a misbehaving upstream (upstream.py) and a trace printer (traces.py), run by scripts/demo.sh."""
