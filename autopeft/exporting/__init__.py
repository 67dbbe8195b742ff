"""Layer 6, export: the format registry (``exporters``) and the peft / merged model folders
(``hf_export``). (Named ``exporting`` because ``autopeft.export`` is the public function.)"""
