"""Layer 6, export: the format registry (``exporters``) and the peft / merged model folders
(``hf_export``, with ``checks``, ``sources``, ``base_model``, ``pooling_code`` and ``model_card`` beside it).
(Named ``exporting`` because ``autopeft.export`` is the public function.)"""
