"""Layer 4, training: one trial trained and scored at each rung, its weights saved and read
(``trainer``), and AdapterFusion's two stages (``fusion``)."""
