"""Does ROME with the paper's residual key (residual_key: mean) avoid the edit-57 norm jump of the study's
ROME arm? Same 300-request sample as study-smollm2 (seed 0), first 58 edits; the data directory is
EAC_DATA_DIR's. Prints one line per edit; the study's run is experiments/results/study-smollm2/mean_key_edit57.log."""
import time

import torch

from orchestrator.driver import select_requests
from workers import settings
from workers.data import load_edit_dataset
from workers.editing import Editor, load_hparams
from workers.models import load_model

torch.set_num_threads(1)
requests = select_requests(load_edit_dataset("counterfact", settings.data_dir()), 300, "random", 0)[:58]
print("case ids 0, 57:", requests[0].case_id, requests[57].case_id, flush=True)
model, tokenizer = load_model("smollm2-135m")
editor = Editor(model, tokenizer, "rome", load_hparams("rome", model, overrides={"residual_key": "mean"}))
started = time.time()


def show(record) -> None:
    print(time.strftime("%H:%M:%S"), record.edit_index, "relative_l1", record.relative_l1,
          "dw_l1", record.dw_l1, "loss", record.loss, flush=True)


editor.apply(requests, batch_size=1, on_edit=show)
print("done in", round(time.time() - started), "s")
