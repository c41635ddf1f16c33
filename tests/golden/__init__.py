"""Golden snapshots of compiled zoo graphs (canonical JSON; see gfcompile/diff.py and cases.py)."""
