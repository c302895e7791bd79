# CPU seconds of tokenize_file alone (no imports): python tokenize_cpu.py PAIRS.jsonl WORKERS CHECKOUT, run as
# for round in 1 2 3; do for w in 1 2; do for tree in /tmp/h10_base /work/wt-10; do TOKENIZERS_PARALLELISM=false \
#   .venv/bin/python benchmarks/results/data_scale/tokenize_cpu.py /tmp/dsbench/pairs-5000.jsonl $w $tree; done; done; done
# (/tmp/h10_base: `git archive f3463ff`, main before this round). Output: tokenize_cpu.txt.
import sys, os, time, resource
sys.path.insert(0, sys.argv[3])
from transformers import AutoTokenizer
from dpo_ds.data import PairTokenizer, tokenize_file
tok = AutoTokenizer.from_pretrained("/tmp/dsbench/model")
pt = PairTokenizer(tok, 1024)
r0 = resource.getrusage(resource.RUSAGE_SELF); c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
t=time.perf_counter()
p = tokenize_file(sys.argv[1], pt, False, int(sys.argv[2]))
w=time.perf_counter()-t
r1 = resource.getrusage(resource.RUSAGE_SELF); c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
print("wall", round(w,2), "main cpu", round(r1.ru_utime+r1.ru_stime-r0.ru_utime-r0.ru_stime,2), "children cpu", round(c1.ru_utime+c1.ru_stime-c0.ru_utime-c0.ru_stime,2), len(p)/w, "pairs/s")
