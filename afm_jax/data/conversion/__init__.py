"""DICOM archive -> dataset, in parallel and resumable: `inputs` (the ordered input list), `chunks` (the plan
and the per-chunk conversion, run by worker processes or SLURM array tasks), `merge` (chunks -> one dataset
with patient splits and a manifest)."""
