"""k-fold cross-validation over synthetic basins (prediction in ungauged basins): the example in docs/regional.md."""
import json, time, torch, numpy as np
torch.set_num_threads(1)
from adjointhydro.synthetic import make_synthetic_basins, TWIN_BOUNDS, TWIN_FIXED
from adjointhydro.regional import cross_validate_basins
from adjointhydro.models import exphydro
t=time.time()
syn = make_synthetic_basins(40, 3, seed=7, method="euler")
ds = syn.dataset; k = np.arange(ds.n_steps)
cv = cross_validate_basins(exphydro, ds, k=4, seed=0, train_mask=(k>=365)&(k<730), test_mask=k>=730,
    epochs=20, batch_size=30, window=None, warmup=365, lr=3e-2, lr_schedule="cosine", method="euler",
    sensitivity="direct", hidden=(16,), parameter_bounds=TWIN_BOUNDS, fixed_parameters=TWIN_FIXED,
    patience=None, val_every=5)
for f in cv.folds:
    print(f["fold"], {p: round(v["median"],3) for p, v in f["summary"]["nse"].items()})
print("pooled", json.dumps(cv.summary("nse")))
print("seconds", time.time()-t)
