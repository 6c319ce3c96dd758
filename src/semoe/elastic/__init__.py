"""semoe.elastic"""
