"""Scaling-law studies: sweep planning and launching, the results table, and the fitter.

Two halves. The sweep half (`spec`, `hparams`, `plan`, `cellfile`, `local`, `slurm`, `results`) turns a spec into
training runs and imports the training code. The fitting half (`runs`, `conventions`, `law`, `fit`, `isoflop`,
`multiplier`, `report`, `plots`) needs numpy, scipy and matplotlib only, so published data can be fitted without
torch: `python -m scaling fit ANY.csv`.
"""
