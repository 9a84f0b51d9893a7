"""Score the students of the two-teacher comparison against BOTH teachers on the quickstart's held-out split.

Run from the repository root after the runs of README.md: python benchmarks/beyond_logits/cross_eval.py
"""

import json

from alambic.config import ModelConfig
from alambic.data import load_prepared
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.models import load_model, load_tokenizer

data = load_prepared("runs/quickstart/data")
instruct = ModelConfig(model="smollm2-135m-instruct", device="cpu")
expert = ModelConfig(model="runs/bbc_expert/final", device="cpu")
students = {
    "instruct_alone": "runs/quickstart/final",
    "expert_alone": "runs/expert_alone/final",
    "mixture_0.5_0.5": "runs/two_teachers_mixture/final",
}
pad = load_tokenizer(instruct).pad_token_id
out = {}
for tname, tcfg in (("instruct", instruct), ("expert", expert)):
    teacher = load_model(tcfg)
    models = {n: load_model(ModelConfig(model=p, device="cpu")) for n, p in students.items()}
    if tname == "instruct":
        models["expert_teacher"] = load_model(expert)
    res = evaluate_against_teacher(teacher, models, data.validation, pad_token_id=pad, batch_size=8)
    out[tname] = {
        n: {
            k: r[k]
            for k in ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher", "intervals", "num_tokens")
        }
        for n, r in res.items()
    }
    for n, r in res.items():
        print(
            f"vs {tname:8s} {n:16s} ppl {r['perplexity']:.2f} top1 {r['top1_agreement']:.4f} "
            f"KL {r['kl_to_teacher']:.4f} {[round(x, 3) for x in r['intervals']['kl_to_teacher']]}"
        )
json.dump(out, open("runs/cross_eval.json", "w"), indent=1)
