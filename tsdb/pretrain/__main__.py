"""``python -m tsdb.pretrain``: the corpus's composition and generation speed, as JSON."""

from tsdb.pretrain.corpus import main

main()
