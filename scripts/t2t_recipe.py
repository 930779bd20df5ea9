"""Simultaneous text-to-text recipe (leapformer_fairseq.recipes.t2t; docs/recipes.md).

    python scripts/t2t_recipe.py prepare --corpus data/gettext-mt-full/en-de.{split}.tsv \
        --src en --tgt de --out work/en-de
    python scripts/t2t_recipe.py train --data work/en-de --config t2t/small --waitk 5
    python scripts/t2t_recipe.py evaluate --data work/en-de --attn-types leap,softmax --waitk 3,5
    python scripts/t2t_recipe.py demo          # all three on the built-in slice (make demo)
"""
from leapformer_fairseq.recipes.t2t import main

if __name__ == "__main__":
    main()
