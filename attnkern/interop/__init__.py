"""How attnkern meets other code: `replace_sdpa` (patching.py: torch's SDPA runs attnkern), the routing rule
that decides per call whether attnkern or torch serves it (dispatch.py, stated once, used by both), and
the transformers integration (transformers.py, which imports transformers only when it is imported)."""
