"""`python -m finetune_core ...`: see cli.py.

`train`, `compare` and `estimate` first restart themselves once with glibc's huge-page heap turned on (see
malloc.py): glibc reads that setting only at process start. The restart keeps the process id and the
interpreter flags, so torchrun and accelerate see no difference.
"""

import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "compare", "estimate"):
        from .malloc import restart_with_hugepages

        restart_with_hugepages()
    from .cli import main

    sys.exit(main())
