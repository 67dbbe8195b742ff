"""Layer 4, training: one trial trained and scored at each rung (``trainer``, the loop), on batches
of tokenised splits (``batches``), scored with intervals (``scoring``), set up from its recipe's
training settings (``setup``), its weights saved and read (``saved``), and AdapterFusion's two stages
(``fusion``)."""
