"""Simultaneous speech-to-text recipe (leapformer_fairseq.recipes.s2t; docs/recipes.md).

    python scripts/s2t_recipe.py prepare --data-root MUSTC_ROOT --lang de --out work/s2t-en-de
    python scripts/s2t_recipe.py train-asr --data work/s2t-en-de --config s2t/asr_base
    python scripts/s2t_recipe.py train-st --data work/s2t-en-de --config s2t/st_base
    python scripts/s2t_recipe.py evaluate --data work/s2t-en-de --attn-types leap,softmax --waitk 5
    python scripts/s2t_recipe.py demo      # TTS slice -> all of the above, tiny models (make demo)
"""
from leapformer_fairseq.recipes.s2t import main

if __name__ == "__main__":
    main()
