"""Model-card templates (installed as ``hf_mfac._model_cards``), rendered by
``hf_mfac.integrations.card.model_card``.

* ``model_card.md`` — a whole new card: YAML front matter (``{{ card_data }}``, filled by
  ``huggingface_hub.ModelCard.from_template``), title, description and the hf_mfac section.
* ``hf_mfac_section.md.jinja`` — the section between the ``<!-- hf_mfac:start -->`` / ``<!--
  hf_mfac:end -->`` markers; it is all hf_mfac ever rewrites in an existing ``README.md``.
"""
