"""Flax adapters: ``qjax.flax.linen`` (layers and an interceptor), ``qjax.flax.nnx`` and
``qjax.flax.serve`` (QAT-trained Linen models served on packed weights).

How a rule finds a layer, the same in Linen :func:`~qjax.flax.linen.intercept`, NNX
:func:`~qjax.flax.nnx.quantize`, :func:`~qjax.flax.serve.convert` /
:func:`~qjax.flax.serve.served` and the ``plan`` listings: rules are ``{regex: value}``,
tried in order, and the first one whose regex ``re.fullmatch``-es any of the layer's
names wins:

* its module path joined with ``/``: ``"Block_0/Dense_1"`` (Linen), ``"blocks/0/linear"``
  (NNX);
* the path of the weight it multiplies with, as :func:`qjax.quantize_tree` sees it:
  ``"Block_0/Dense_1/kernel"`` (``embedding`` for an Embed), and for Linen also under its
  collection, ``"params/Block_0/Dense_1/kernel"``.

So ``{".*kernel": "int8"}``, written for a parameter tree, quantizes the same layers in
PTQ, QAT and serving. Shorthand without ``axis=`` (``"int8:per_channel"``,
``"int4:per_block:32"``, ``"mxfp4"``) takes its axes from the weight's layout, as
:class:`qjax.resolve.RulePlan` reads Flax tensors: a kernel ``[..., in, out]`` is scaled per
output channel and blocked along its inputs, an Embed table ``[vocab, features]`` per row
and blocked along its features. A rule that wins no layer is reported by
:func:`qjax.resolve.report_unmatched`: a :class:`~qjax.resolve.QjaxRuleWarning` by default, a
``ValueError`` with ``strict=True``. ``qjax.flax.linen.plan`` and ``qjax.flax.nnx.plan``
list what each rule does to each parameter.
"""
