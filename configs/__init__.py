"""The paper's settings, one TOML file per dataset, installed as ``stop_fast.configs``:
``--config hmdb51`` finds ``hmdb51.toml`` here (see ``stop_fast.train.config.config_path``)."""
