"""Data: tables and where they come from, chat formatting, triggers, the typed batch layouts and their builders."""
