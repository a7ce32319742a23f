"""The demo and the evaluation kit: everything `rapidin-index demo`, the benchmarks and the notebook use
to make a fine-tuned model whose training data has a known answer, and to score an attribution method
against it. The product (`build`, `query`, `export`, ...) never imports this package.

* `run`: `rapidin-index demo` end to end (data, model, index, attacked queries, report, metrics)
* `datasets`: the bundled docstring rows; backdoor (non-lexical, lexical) and entity-swap data sets
* `style`: the non-lexical backdoor's greetings, fable grammar and its detector
* `finetune`: tiny-model fine-tuning on CPU (full or LoRA), attack success rate, response losses
* `tiny_models`: tiny Llama / GPT-2 models and tokenizers built in-process from config classes
* `metrics`: auPRC / auROC on top-k + bottom-k, precision@k, ROC-AUC, Spearman
* `baselines`: BM25, embedding similarity, random scores
"""
