"""The experiment workflow: named experiments at a scale and seed, run through DVC (`runner`,
`python -m pipeline.experiments`), compared with their spread (`compare`), `make run`'s entry
(`launch`), params.yaml against HEAD (`committed`) and one experiment at a time per workspace
(`runlock`). Kept free of imports so that a stage can use `runlock` without loading the runner."""
