"""Evaluation of model variants against a baseline: perplexity, divergence, memory, speed, reports.

Modules, in the order a run uses them: ``data`` (the token stream), ``perplexity`` (sliding
windows, plain or layer-sequential), ``compare`` (KL, top-1 changes and router agreement against
the baseline), ``memory`` (bytes by component, bits per parameter, peak memory), ``speed``
(prefill and decode throughput), ``report`` (JSON / Markdown / HTML and the regression gate) and
``runner`` (:func:`evaluate`, what ``mixtral-quant eval`` calls).
"""
