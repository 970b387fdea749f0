"""GPU decode benchmark (Llama-2-7B shapes, random fp16 weights): see specee_compile/eval/gpu_bench.py.

    PYTHONPATH=$PWD python3 benchmarks/gpu_bench.py --yardstick benchmarks/plain_decode_yardstick.py
    python benchmarks/gpu_bench.py --device cpu --tiny --new-tokens 16   # CPU dry run
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specee_compile.eval.gpu_bench import main

if __name__ == "__main__":
    sys.exit(main())
