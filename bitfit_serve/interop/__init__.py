"""Interop with other tools' formats: PEFT adapters in (``peft_import``), standard model folders out (``hf_export``)."""
