"""Does ROME with the paper's residual key (residual_key: mean) avoid the edit-57 norm jump of the study's
ROME arm? Same 300-request sample as study-smollm2 (seed 0), first 58 edits."""
import os, sys, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from orchestrator.driver import select_requests
from workers.data import load_edit_dataset
from workers.models import load_model
from workers.editing import Editor, load_hparams

requests = select_requests(load_edit_dataset("counterfact", "/work/shared/data"), 300, "random", 0)[:58]
print("case ids 0, 57:", requests[0].case_id, requests[57].case_id, flush=True)
model, tokenizer = load_model("smollm2-135m")
hp = load_hparams("rome", model, overrides={"residual_key": "mean"})
editor = Editor(model, tokenizer, "rome", hp)
t0 = time.time()
def show(record):
    rl = getattr(record, "relative_l1", None)
    print(time.strftime("%H:%M:%S"), getattr(record, "edit_index", "?"), "relative_l1", rl,
          "dw_l1", getattr(record, "dw_l1", None), "loss", getattr(record, "loss", None), flush=True)
editor.apply(requests, batch_size=1, on_edit=show)
print("done in", round(time.time() - t0), "s")
