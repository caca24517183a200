"""Data curation: find the informative images of an archive automatically (tools/curate.py).

Modules, one job each:
  config.py             the settings (thresholds, dedup, clustering, selection, retrieval) and their checks
  scan.py               the one pass over the records: decode, signals, hashes, thumbnail, metadata
  quality.py            quality signals per image and the filters (incl. metadata allow/deny rules)
  duplicates.py         exact / perceptual / embedding near-duplicates with faiss, grouping, kept representative
  embeddings.py         where embeddings come from (thumbnail baseline, .npz/.npy files, an injected model)
  clustering.py         hierarchical k-means, balanced sampling order, retrieval toward seeds, per-patient caps
  report.py             contact sheets and the Markdown report
  curate.py             `curate(...)`: the stages in order, manifest and report.json
  synthetic_defects.py  the synthetic set with injected defects and the truth (tests, bench, how-to)

The selection files it writes are afm_jax/data/selection.py's. See docs/curate.md.
"""
