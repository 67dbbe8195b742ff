"""Layer 3, composition: the recipe and the edge where files are read (``recipe``) and the model that
composes method components on one backbone (``model``: ``ComposedModel``, with its UniPELT ``gates``, its
``adapter_hosts`` and its ``prefix`` attention; ``walk``: the backbone's own modules through autopeft's
wrappers)."""
